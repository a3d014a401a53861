"""Algorithm pieces (losses, acting, target updates); the loops live in fastrl.training."""
