"""SmartNodule node package."""
