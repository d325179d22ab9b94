from setuptools import find_packages, setup

setup(
    name="nlbproxy",
    version="0.1.0",
    description="Network load balancing with traffic routing (US 7,567,504) on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py (twistd scans it as a namespace), so
    # find_packages() leaves it out; it must be listed by hand.  plugins/ holds
    # the routing plugins (nlbproxy.plugin), found with twisted.plugin too.
    packages=find_packages(include=["nlbproxy", "nlbproxy.*"]) + ["twisted.plugins", "plugins"],
    package_data={"nlbproxy": ["py.typed"], "twisted.plugins": ["nlbproxy_plugins.py"]},
    install_requires=[
        "twisted>=24.7",
        "pyopenssl>=24",
        "cryptography>=42",
        "h11>=0.16",
        "service-identity>=24",
        "zope.interface>=6",
    ],
    extras_require={
        "test": [
            "pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "ruff", "mypy", "mypy-zope", "selenium>=4.20",
            # real SOAP services and client for the SOAP router's end-to-end tests
            "spyne>=2.14", "zeep>=4.2", "lxml>=5",
            "selenium>=4.20",
        ],
        "bench": ["pyinstrument"],
    },
    entry_points={"console_scripts": ["nlbctl = nlbproxy.ctl:main"]},
)
