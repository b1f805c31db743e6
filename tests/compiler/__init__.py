"""Tests of libragrad_fx.compiler."""
