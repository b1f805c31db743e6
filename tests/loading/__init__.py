"""Tests of libragrad_fx.loading."""
