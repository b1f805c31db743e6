"""Tests of libragrad_fx.digits."""
