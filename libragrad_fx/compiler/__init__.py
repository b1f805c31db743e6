"""The compiler: a model becomes a graph (frontends/), one vocabulary (canonical), rewritten
rule by rule (rules/), certified (certify, bias) and reported (report)."""
