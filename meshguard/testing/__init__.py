"""Fakes for tests and simulations, shipped with the code so they stay in step with it."""
