"""Random-effect coordinates: one logistic regression per entity (docs/design.md §1, §3)."""
