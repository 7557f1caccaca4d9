"""The formats `parallelflow convert` reads (SOURCES) and writes (TARGETS); torch-free, for the CLI."""

SOURCES = ("fla-deltanet", "fla-deltaproduct", "llama", "pflow")
TARGETS = ("pflow", "fla-deltanet")
