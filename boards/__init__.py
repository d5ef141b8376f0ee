"""kriallm boards package."""
