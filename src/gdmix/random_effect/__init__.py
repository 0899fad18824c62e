"""Random-effect coordinates: one logistic regression per entity (DESIGN.md §1, §3)."""
