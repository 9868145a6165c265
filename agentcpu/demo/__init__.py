"""The embedded demo: a small self-trained tool-using model, its tools and tasks."""
