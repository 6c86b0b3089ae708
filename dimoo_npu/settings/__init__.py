"""Requests and their settings: one request type per task and the one table of generation defaults."""
