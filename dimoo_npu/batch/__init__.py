"""Resumable batch jobs: batch files and each rank's share, resuming, answer files, progress, prompt sets."""
