"""Transports: how vectors travel between workers and the center."""
