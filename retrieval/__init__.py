"""SmartNodule retrieval package."""
