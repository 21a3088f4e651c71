"""SmartNodule scheduler package."""
