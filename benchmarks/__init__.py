"""Commands that measure the project on real photos (README.md here says what each prints)."""
