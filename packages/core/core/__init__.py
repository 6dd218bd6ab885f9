"""Meshtron core package."""
