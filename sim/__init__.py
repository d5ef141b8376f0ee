"""kriallm sim package."""
