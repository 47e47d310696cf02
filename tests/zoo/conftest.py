"""The model zoo: random-init small models from timm, torchvision and transformers (the
``zoo`` extra: ``pip install -e ".[zoo]"``). A family whose package is missing or cannot be
imported (timm needs a torchvision that matches torch) is skipped."""



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a minute on a 2-core CPU")
