"""Tests of libragrad_fx.attribution."""
