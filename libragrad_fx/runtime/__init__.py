"""What rewritten graphs call: operators with the original forward and LibraGrad's backward.

Nothing here imports the compiler, so a saved graph needs only this package to run.
"""
