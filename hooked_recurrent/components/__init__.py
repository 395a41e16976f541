"""Model components: one file per idea (norms, MLPs, attention, and one per recurrent mixer)."""
