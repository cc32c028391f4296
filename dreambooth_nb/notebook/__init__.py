"""What the notebooks call: panels and widgets, the platform, the project folder, the headless demo."""
