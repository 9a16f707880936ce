"""Recipes: one folder each (thann.training.recipe says what a recipe is). Entry points name them
in thann.cli; nothing else imports a recipe."""
