"""Meshtron train package."""
