from membercare.cli import main

main()
