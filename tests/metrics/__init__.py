"""Tests of libragrad_fx.metrics."""
