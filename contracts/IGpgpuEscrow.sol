// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title GPGPU escrow
/// @notice Holds renters' stablecoin deposits, reserves a signed budget per job, pays providers for
/// the leases the marketplace settles, and keeps the platform fee apart for the treasury.
/// @dev Money conservation, checked by the test suite after every operation:
///   token.balanceOf(escrow) == sum(availableBalance) + sum(job reservations) + sum(earnings) + feesAccrued.
/// Only `deposit` and the withdrawals move tokens in or out; every other function moves money between
/// the four terms: activating a budget moves `maxAmount` from the renter's available balance to the
/// job's reservation (a skipped budget moves nothing), settlement moves it from the reservation to
/// earnings and fees, `releaseJob` moves the unspent rest back to the available balance.
/// All amounts are in the token's smallest unit.
///
/// Reservation before work: the marketplace activates a job's budget with `reserve` before any lease
/// of the job starts, and places only jobs whose `BudgetReserved` it has seen confirmed. `withdraw`
/// takes only the available (unreserved) balance, so whatever a running job can still be charged
/// stays in its reservation until the job is released: every second a provider runs is payable.
/// A budget that cannot be activated never reverts a batch; it is skipped with `BudgetSkipped`, so
/// one renter (an emptied balance, a bad signature) cannot hold up everyone else's reservations.
///
/// Settlement items are packed two 32-byte words per lease, to keep calldata small:
///   word 0: provider address (bits 255..96) | cumulativeCharge (uint96, bits 95..0)
///   word 1: jobId (uint192, bits 255..64) | leaseId (uint64, bits 63..0)
/// `cumulativeCharge` is the lease's total charge so far; the escrow pays only the increase since
/// the lease was last settled, so a repeated or replayed batch pays nothing twice.
///
/// Lease ordering rule: a job runs one lease at a time and lease ids increase. The escrow remembers,
/// per job, only the current lease and what it has settled. The marketplace settles a lease's final
/// charge before the first charge of its successor; an item whose lease id is lower than the job's
/// current one is therefore stale and is skipped (with `SettlementItemSkipped`), never paid.
///
/// Fee rounding: for every paid amount, fee = paid * feeBps / 10_000 rounded down; the provider gets
/// paid - fee. The two parts sum exactly to what leaves the job's reservation.
///
/// Pause: stops `deposit`, `reserve` and `settle` (no new obligations). Withdrawals of available balances,
/// earnings and fees, and job releases, stay open while paused, so that money already owed to
/// someone is never locked in by an operational stop.
interface IGpgpuEscrow {
    /// @notice A renter's authorization to reserve up to `maxAmount` for job `jobId`.
    /// @dev Signed as EIP-712 typed data `Budget(uint256 jobId,address renter,uint256 maxAmount,uint256 deadline)`
    /// under the domain {name: "GpgpuEscrow", version: "1", chainId, verifyingContract}.
    /// `deadline` (unix seconds) is the last moment the operator may activate the budget, and after
    /// it the renter may release the job's unspent reservation without the operator.
    struct BudgetAuthorization {
        uint256 jobId;
        address renter;
        uint256 maxAmount;
        uint256 deadline;
        bytes signature;
    }

    /// @notice Why a budget was not activated (see `BudgetSkipped`).
    enum BudgetSkipReason {
        AlreadyKnown, // the job already has a budget (activated earlier, or a replayed batch): nothing changed
        Expired, // block.timestamp is past the authorization's deadline
        InvalidBudget, // zero maxAmount, maxAmount above uint96, or jobId above uint192
        InvalidSignature, // the signature does not recover `renter` over exactly this budget
        InsufficientBalance // the renter's available balance is below maxAmount
    }

    /// @notice Why a settlement item was skipped rather than paid.
    enum SkipReason {
        UnknownJob, // no budget was ever activated for the job
        JobClosed, // the job was released; it takes no more charges
        StaleLease, // the lease id is lower than the job's current lease
        InvalidItem // zero provider or zero lease id
    }

    // ---------------------------------------------------------------- events

    event Deposited(address indexed renter, uint256 amount);
    event Withdrawn(address indexed renter, uint256 amount);
    /// @notice A budget was activated: `maxAmount` moved from the renter's available balance to the job.
    event BudgetReserved(uint256 indexed jobId, address indexed renter, uint256 maxAmount, uint256 deadline);
    /// @notice A budget was not activated and nothing moved (see `BudgetSkipReason`); the rest of the batch went on.
    event BudgetSkipped(uint256 indexed jobId, address indexed renter, BudgetSkipReason reason);
    /// @notice The job was closed; `refunded` (its unspent reservation) went back to the renter.
    event JobReleased(uint256 indexed jobId, address indexed renter, uint256 refunded);
    /// @notice A settlement item was not paid at all (see `SkipReason`).
    event SettlementItemSkipped(uint256 indexed jobId, uint256 indexed leaseId, SkipReason reason);
    /// @notice A lease's charge exceeded the job's remaining reservation; `refused` was not paid.
    event ChargeCapped(uint256 indexed jobId, uint256 indexed leaseId, uint256 refused);
    /// @notice `amount` (after fee) was added to the provider's withdrawable earnings.
    event EarningsCredited(address indexed provider, uint256 amount);
    /// @notice One settlement batch: `paid` left job reservations, of which `fees` went to the treasury's account.
    event Settled(uint256 itemCount, uint256 paid, uint256 fees);
    event EarningsWithdrawn(address indexed provider, uint256 amount);
    event FeesWithdrawn(address indexed treasury, uint256 amount);
    event FeeChanged(uint256 oldFeeBps, uint256 newFeeBps);
    event TreasuryChanged(address indexed oldTreasury, address indexed newTreasury);

    // ---------------------------------------------------------------- errors

    error GpgpuEscrow_ZeroAmount();
    error GpgpuEscrow_ZeroAddress();
    error GpgpuEscrow_InsufficientBalance(address renter, uint256 available, uint256 requested);
    error GpgpuEscrow_NoBudgets();
    error GpgpuEscrow_MalformedItems(uint256 wordCount);
    error GpgpuEscrow_UnknownJob(uint256 jobId);
    error GpgpuEscrow_JobClosed(uint256 jobId);
    error GpgpuEscrow_ReleaseNotAllowed(uint256 jobId, uint256 deadline);
    error GpgpuEscrow_SettlementBehind(uint256 jobId, uint256 leaseId, uint256 settledCharge);
    error GpgpuEscrow_NothingToWithdraw();
    error GpgpuEscrow_NotTreasury(address caller);
    error GpgpuEscrow_FeeTooHigh(uint256 feeBps, uint256 maxFeeBps);

    // ---------------------------------------------------------------- renters

    /// @notice Pulls `amount` tokens from the caller (after `approve`) into their available balance.
    /// @dev Reverts while paused, on zero amount, or if the transfer fails. The token must be a plain
    /// ERC-20 (no fee on transfer, no rebasing): the escrow credits exactly `amount`.
    function deposit(uint256 amount) external;

    /// @notice Sends `amount` of the caller's available (unreserved) balance back to them.
    /// @dev Reverts with `GpgpuEscrow_InsufficientBalance` if more than the available balance is
    /// asked; funds reserved for jobs are never withdrawable until the job is released.
    function withdraw(uint256 amount) external;

    /// @notice Closes job `jobId` and returns its unspent reservation to the renter's available balance.
    /// @dev Callable by an operator at any time, or by the job's renter once its budget deadline has
    /// passed. Afterwards every settlement item for the job is skipped (`JobClosed`).
    /// `leaseId` and `settledCharge` are what the caller holds settled for the job: the call reverts
    /// with `GpgpuEscrow_SettlementBehind` (carrying the job's current lease and settled charge)
    /// when the escrow is behind them, that is when its current lease is older than `leaseId`, or
    /// is `leaseId` with less than `settledCharge` settled. The operator passes the last settlement
    /// its ledger holds confirmed: a release decided before a chain rollback took that settlement
    /// away, and mined after it, would close the job with the charge unpaid for good (the
    /// settlement sent again would be skipped); it reverts instead. Zero and zero always pass.
    function releaseJob(uint256 jobId, uint256 leaseId, uint256 settledCharge) external;

    // ---------------------------------------------------------------- operator

    /// @notice Activates budgets ahead of work: moves each authorization's `maxAmount` from its renter's
    /// available balance to its job's reservation, and emits `BudgetReserved`.
    /// @dev OPERATOR_ROLE only, not while paused; reverts with `GpgpuEscrow_NoBudgets` when empty. The
    /// marketplace sends it before any lease of the jobs starts. A budget is never a reason to revert
    /// the batch: one that cannot be activated (its job already known, expired, malformed, not signed by
    /// its renter, or more than the renter's available balance at that moment) is skipped with
    /// `BudgetSkipped(jobId, renter, reason)` and moves nothing. Budgets are taken in order, so two
    /// budgets of one renter that together exceed its balance: the first is reserved, the second skipped.
    /// Replaying a batch therefore reserves nothing twice (every budget is skipped as `AlreadyKnown`).
    /// @param budgets The authorizations to activate, each signed by its renter (EIP-712, see above).
    function reserve(BudgetAuthorization[] calldata budgets) external;

    /// @notice Activates any budgets given (exactly as `reserve`), then pays the packed lease items
    /// (see the contract header).
    /// @dev OPERATOR_ROLE only, not while paused. The marketplace reserves budgets with `reserve` before
    /// the work and sends `budgets` empty; the parameter stays for jobs whose budget was never reserved.
    /// Neither budgets nor items revert the batch: budgets are skipped as in `reserve`; unknown, closed,
    /// stale and invalid items are skipped with `SettlementItemSkipped`, and a charge above the job's
    /// remaining reservation is paid only up to it (`ChargeCapped`).
    /// Gas: sort items by provider; consecutive items of one provider are credited with one write.
    /// @param items Two words per lease, packed as documented above.
    /// @param budgets Authorizations to activate first (usually none).
    function settle(bytes32[] calldata items, BudgetAuthorization[] calldata budgets) external;

    // ---------------------------------------------------------------- payees

    /// @notice Sends the caller (a provider) all their earnings; reverts with
    /// `GpgpuEscrow_NothingToWithdraw` when there are none. Open while paused.
    function withdrawEarnings() external;

    /// @notice Sends all accrued fees to the treasury; only the treasury may call. Open while paused.
    function withdrawFees() external;

    // ---------------------------------------------------------------- admin

    /// @notice Sets the platform fee in basis points (DEFAULT_ADMIN_ROLE); above MAX_FEE_BPS it reverts
    /// with `GpgpuEscrow_FeeTooHigh`. Applies to settlements from the next batch on.
    function setFee(uint256 newFeeBps) external;

    /// @notice Sets the treasury (DEFAULT_ADMIN_ROLE). Fees already accrued become the new treasury's to withdraw.
    function setTreasury(address newTreasury) external;

    /// @notice Stops deposits, reservations and settlements (PAUSER_ROLE).
    function pause() external;

    /// @notice Resumes deposits, reservations and settlements (PAUSER_ROLE).
    function unpause() external;

    // ---------------------------------------------------------------- views

    /// @notice The ERC-20 token this escrow holds; fixed at deployment.
    function token() external view returns (address);

    function treasury() external view returns (address);

    function feeBps() external view returns (uint256);

    function feesAccrued() external view returns (uint256);

    /// @notice What `renter` may withdraw or reserve now (never what a job's reservation holds).
    function availableBalance(address renter) external view returns (uint256);

    /// @notice What `provider` may withdraw now.
    function earnings(address provider) external view returns (uint256);

    /// @notice The state of job `jobId`. `closed` jobs have zero `remaining`; an unknown job has a zero `renter`.
    /// @return renter The renter who signed the job's budget.
    /// @return deadline The budget's deadline (saturated to uint64).
    /// @return remaining The reservation not yet paid out.
    /// @return leaseId The current lease (0 before the first paid item).
    /// @return settledCharge The current lease's cumulative charge already settled (paid or refused).
    /// @return closed Whether the job was released.
    function job(uint256 jobId)
        external
        view
        returns (address renter, uint256 deadline, uint256 remaining, uint256 leaseId, uint256 settledCharge, bool closed);

    /// @notice The EIP-712 digest a renter signs for `budget` (its `signature` field is ignored).
    function budgetDigest(BudgetAuthorization calldata budget) external view returns (bytes32);
}
