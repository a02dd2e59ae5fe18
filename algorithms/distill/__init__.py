"""On-policy distillation: GKD's generalised Jensen-Shannon divergence between a student (the
model being trained) and a teacher, on student, teacher or data completions
(docs/ALGORITHMS.md)."""
