"""SmartNodule review_web package."""
