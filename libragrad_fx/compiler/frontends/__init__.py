"""How a model becomes an FX graph: symbolic tracing (fx) or torch.export (export, aten)."""
