"""What the photos and class folders hold: usable images, captions, what is missing."""
