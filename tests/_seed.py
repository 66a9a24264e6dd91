"""The autoencoder from ``shared/seed-question.txt``, exactly as the question writes it."""

from torch import nn


class AE(nn.Module):
    def __init__(self, x_dim, z_dim, h_dim=42):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, z_dim))
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, h_dim),
            nn.ReLU(),
            nn.Linear(h_dim, x_dim),
        )

    def forward(self, x):
        z = self.encoder(x)
        x = self.decoder(z)
        return x


class AENetwork(nn.Module):
    """The same autoencoder in the single-``nn.Sequential`` form of the seed's second answer:
    ``Linear(h_dim, z_dim)`` followed directly by ``Linear(z_dim, h_dim)``."""

    def __init__(self, x_dim, z_dim, h_dim=42):
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(x_dim, h_dim),
            nn.ReLU(),
            nn.Linear(h_dim, z_dim),
            nn.Linear(z_dim, h_dim),
            nn.ReLU(),
            nn.Linear(h_dim, x_dim),
        )

    def forward(self, x):
        return self.network(x)
