"""Tests of libragrad_fx.runtime."""
