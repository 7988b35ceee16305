"""Validation of an expert the way it will be used."""
