"""psc.plugins: integrations with viewers (napari)."""
