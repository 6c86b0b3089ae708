"""Adapters that let other tools drive DiMOO (lmms-eval); each imports its tool lazily, only where it must."""
