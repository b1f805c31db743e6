"""Tests of libragrad_fx.commands."""
