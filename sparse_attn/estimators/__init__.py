"""Scoring of the query sample that the patterns share: readable torch versions (`sample_mass`, `row_sample`,
`frame_period`, `tiles`) and the fused Triton score kernels (`triton_scores`) that replace them on CUDA tensors."""
