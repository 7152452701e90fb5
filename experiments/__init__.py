"""Seed entry points of the user's workflow (DESIGN §1); thin wrappers over the `safe` package."""
