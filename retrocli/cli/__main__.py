from retrocli.cli import main

main()
