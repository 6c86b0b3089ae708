"""Errors, environment variables and the number and path checks that every layer shares."""
