"""Meshtron models package."""
