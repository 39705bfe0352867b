"""Side-by-side benchmark of local attention implementations (`windowed-attention bench`)."""
