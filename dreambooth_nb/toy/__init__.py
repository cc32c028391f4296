"""The embedded toy model's world, its measurements, and tiny models built from configs."""
