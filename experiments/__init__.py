"""Seed entry points of the user's workflow (README, "The workflow on real data"); thin wrappers over the `safe` package."""
