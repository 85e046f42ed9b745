"""Independent JAX/optax reference for Muon, NorMuon and AdamW (nanochat-style hybrid)."""
