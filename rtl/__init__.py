"""kriallm rtl package."""
