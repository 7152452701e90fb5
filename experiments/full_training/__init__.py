"""Full-scale Stage A experiment: data staging and training entry points."""
