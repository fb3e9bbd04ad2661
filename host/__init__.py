"""ptmig host coordinator: the ptmig CLI, ptmigd and the migration workflow."""
