"""The autoencoder (Table I), its losses, and the model bundle. No training code lives here."""
